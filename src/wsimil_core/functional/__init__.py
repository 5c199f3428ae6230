"""Pure building blocks defined by the papers' formulas, each tested against its equation.

One module per topic; every public function is re-exported here.
"""
