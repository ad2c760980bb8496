"""Kafka and Faust: the worker, the decision engine, its state, producers and consumers."""
