"""Entry points: one function per experiment, each a short composition of data, models, engine and tracking."""
