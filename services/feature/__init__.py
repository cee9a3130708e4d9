"""Feature: CLIP inference. Turns texts and images into L2-normalised float32 vectors."""
