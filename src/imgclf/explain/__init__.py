"""Where the model looks: Grad-CAM explanations of a bundle's predictions (issue 18)."""
