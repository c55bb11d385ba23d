from atop_models.registry import Registry

PURIFIERS = Registry("purifier")
