"""Data: corpus tables, public caption-file importers, item encoders (media -> embeddings)."""
