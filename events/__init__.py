"""The contract every layer shares: event declarations, settings, errors."""
