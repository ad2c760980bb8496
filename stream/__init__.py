"""Kafka: the Faust app, agents, topics, schemas, producers, replay."""
