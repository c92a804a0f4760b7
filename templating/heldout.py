"""A short held-out English text for before/after perplexity (written for this project).

It shares no text with the embedded calibration documents, so the demo's evaluation is not
measured on the data it was calibrated on.
"""

HELDOUT_TEXT = """\
The old lighthouse stands at the end of a narrow spit of land, and for most of its history it was kept by
a single family. Each evening the keeper climbed one hundred and twelve steps to light the lamp, wound the
clockwork that turned the lens, and wrote the weather in a leather book. The entries are short: wind from
the west, light rain, two fishing boats returned before dark. Read together, they describe forty years of a
coast that changed slowly and then all at once, when the harbour was dredged and the large cargo ships began
to arrive.

A bicycle is one of the most efficient machines people have built. A rider on a flat road turns most of the
energy of the legs into forward motion, losing only a little to friction in the chain and the tyres. The
frame has to be stiff where force is applied and light everywhere else, which is why designers have tried
steel, aluminium, titanium and carbon fibre in turn. Gears let the rider keep a steady rhythm on hills and in
headwinds, and good brakes matter more than any of it when the road runs downhill into a town.

Bread needs only flour, water, salt and yeast, yet no two bakers make the same loaf. The flour decides how
much water the dough can hold; the temperature of the kitchen decides how fast the yeast works; and the
baker's patience decides how much flavour develops before the loaf goes into the oven. A long, cool rise
gives a more complex taste than a short, warm one. The crust forms when the surface dries and browns, and
steam in the first minutes of baking keeps it thin and crisp.

Libraries began as collections of clay tablets and papyrus scrolls kept by temples and kings. Over centuries
they became public places where anyone could read, borrow and study. A modern library still lends books, but
it also offers quiet rooms, computers, classes for children and help for people looking for work. Librarians
spend much of their time teaching others how to find reliable information, a skill that has become more
important as the amount of writing in the world has grown.

When a volcano erupts, the first danger is rarely the lava, which usually moves slowly enough for people to
walk away from it. Ash is more dangerous: it can fall over a wide area, collapse roofs, ruin crops and stop
aircraft engines. Gases can collect in low valleys, and heavy rain on fresh ash can start mudflows that
travel far from the mountain. Scientists watch for small earthquakes, swelling of the ground and changes in
the gases at the summit, and these signs often give days or weeks of warning.

The first maps of the sea floor were made by lowering a weighted rope and noting how much of it ran out before
the weight touched bottom. It was slow work, and a single crossing of an ocean might record only a few hundred
depths. Sound changed everything. A ship that sends a pulse of sound downward and times its echo can measure
depth many times a minute, and modern instruments sweep a wide strip of the sea floor at once. The maps they
produce show ridges longer than any mountain range on land, deep trenches, and thousands of flat-topped
mountains that were once islands.

A good garden is planned for the whole year, not only for the summer. Early bulbs flower before the trees have
leaves; shrubs carry the colour into late spring; perennials fill the summer; and grasses, seed heads and
evergreen plants give shape to the garden in winter. Gardeners who leave some stems standing through the cold
months also give shelter to insects and food to birds, and the garden is busier for it in the following year.
"""
