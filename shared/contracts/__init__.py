"""The bodies that services send each other, declared once: the service that answers declares
its routes with these models and its callers parse the answers with them, so a field renamed on
one side fails the tests of the other instead of production."""
