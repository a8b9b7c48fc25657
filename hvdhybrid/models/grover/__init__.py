"""GROVER: a self-supervised graph transformer for molecules (Rong et al. 2020)."""
