"""Flower ServerApp for fedkd (thin glue over ``fedkd.fusion`` and ``fedkd.reporting``)."""
