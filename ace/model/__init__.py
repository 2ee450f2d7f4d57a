"""The generative model: identifier tokens, fusion, AceModel, trie-constrained beam search."""
