"""What a run starts from: models and their weights, images and labels, targets (scores of the
output), layer names, forward hooks, the model zoo and Ray Dataset input.
"""
