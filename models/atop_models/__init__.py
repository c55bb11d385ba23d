"""AToP models: random transforms, purifier, classifiers, defended pipeline, trainer."""
