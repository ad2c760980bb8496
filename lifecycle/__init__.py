"""What happens to a model version after training: daily retrain, monitor and rollback, replay."""
