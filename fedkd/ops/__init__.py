"""Operations: running fedkd across hosts (deployment helpers, a site's node settings).

No Flower imports; the Flower commands are built as argument lists.
"""
