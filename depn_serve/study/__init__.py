"""DEPN's analyses as reproducible studies: each writes `<study>.json` and its figures into a results folder."""
