"""Cost analysis: parameters, multiply-adds, and the complexity argument behind Swin."""
