from services.feature.app import create_app
from services.feature.settings import FeatureSettings
from shared.app import serve

if __name__ == "__main__":
    serve("feature", create_app, FeatureSettings())
