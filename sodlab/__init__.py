"""sodlab: small object detection by generative and discriminative learning."""
