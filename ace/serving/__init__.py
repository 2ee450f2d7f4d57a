"""Serving a trained run: the retriever, the item store, the items CLI and the HTTP server."""
