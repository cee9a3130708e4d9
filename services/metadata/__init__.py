"""Metadata service: collections, items, captions and their images; the source of item and
caption ids and of attribute filters (allow-lists) for the search flow."""
