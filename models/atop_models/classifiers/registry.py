from atop_models.registry import Registry

CLASSIFIERS = Registry("classifier")
