"""Block models, cuts, references, the zoo and its data, export: what every other stage handles."""
