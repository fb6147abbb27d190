"""UI-free core of the batch image classification dashboard: sources, labels, models, Ray Data runs."""
