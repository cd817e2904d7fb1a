"""Evaluation: extraction, exposure, MRR and validation perplexity before and after a mask, per tenant."""
