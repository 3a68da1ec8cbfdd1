"""Flower ClientApp for fedkd sites (thin glue over ``fedkd.federation.site``)."""
