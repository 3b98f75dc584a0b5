import custom_layers  # noqa: F401  (chooses Keras' backend before anything imports Keras)
