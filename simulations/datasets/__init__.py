"""Generators that write datasets as files for fedkd's own-data path (``data.dataset = "file"``)."""
