from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from shared.app import serve

if __name__ == "__main__":
    serve("gateway", create_app, GatewaySettings())
