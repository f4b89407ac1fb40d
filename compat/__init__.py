"""Adapters from taskrunners to interfaces other libraries already accept."""
