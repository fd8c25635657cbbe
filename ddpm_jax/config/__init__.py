"""The config layer: `factories` (config -> schedule tables, model, loss, sampler),
`validation` (the one validator, run once before anything compiles) and `conditioning` (labels and
guided model functions of class-conditional models). Nothing below this layer reads a ConfigDict.
"""
