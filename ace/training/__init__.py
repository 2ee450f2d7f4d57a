"""Training the generative model: the loop, its losses, the optional prefix-prototype teacher."""
