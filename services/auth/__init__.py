"""The auth service: principals (users and clients), OAuth2 token endpoint, JWKS."""
