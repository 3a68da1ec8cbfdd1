"""The federation itself, without Flower: the site's round (:mod:`.site`), the server's
round (:mod:`.server`) and the loop over a small Transport interface (:mod:`.loop`).
"""
