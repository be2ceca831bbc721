"""CPU acceleration, kept out of the models: the capability probe (capabilities.py)."""
