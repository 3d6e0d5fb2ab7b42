"""Training data: the stored sample format, streaming datasets, collation (pad / pack) and DOT."""
