"""The test suite: ``tests.helpers`` and the toy-data modules are imported
by package name, not put on ``sys.path``."""
