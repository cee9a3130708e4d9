"""Common library of the Crossmodal Search services: settings, logging, errors, metrics,
HTTP clients and token verification. Only what every service needs lives here."""
