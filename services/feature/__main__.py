import os

# Before torch loads OpenMP: threads that finish an operation sleep instead of spinning. On a
# small machine shared with other services a spinning thread burns the core that the thread it
# waits for needs, and each operation can then take a whole scheduler time slice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from services.feature.app import create_app
from services.feature.settings import FeatureSettings
from shared.app import serve

if __name__ == "__main__":
    serve("feature", create_app, FeatureSettings())
