"""Models: the networks, above the data layer and below the runtime.

- `backbones`: the registry (any timm name, plus curated entries that know their offline weights);
- `classifier`: `ImageClassifier`, a headless backbone followed by a head;
- `article`: the article recipe's flattened VGG conv base.

Import from the modules; this package exports nothing itself.
"""
