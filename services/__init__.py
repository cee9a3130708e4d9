"""The five Crossmodal Search services, one package each."""
