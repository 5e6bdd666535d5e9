"""Helper modules and child-process scripts of the tests."""
