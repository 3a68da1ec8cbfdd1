"""Single-machine studies: run fedkd federations on Flower's simulation engine."""
