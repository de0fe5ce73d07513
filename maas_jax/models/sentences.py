"""A fixed, varied set of English sentences for measuring embedding drift.

The sentences cover many topics and lengths (3 to 40 words) so that the cosine similarity
between the embeddings of an original and of a rewritten (e.g. quantized) MiniLM is not
dominated by one kind of input. The first eight are the ones whose sentence-transformers
embeddings are stored in ``tests/data/minilm_reference.npz``; do not reorder them.

Example:
    >>> from maas_jax.models.sentences import SENTENCES
    >>> len(SENTENCES) >= 64
    True
"""

SENTENCES: tuple[str, ...] = (
    # The first eight: reference embeddings are stored for these (keep them in place).
    "A man is playing a guitar on the street corner.",
    "The quarterly earnings report exceeded analysts' expectations by a wide margin.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
    "Where is the nearest train station?",
    "She baked a chocolate cake for her grandmother's ninetieth birthday party last Sunday.",
    "Cats sleep a lot.",
    "The new compiler pass fuses elementwise operations to reduce memory traffic on accelerators.",
    "After three days of heavy rain, the river finally overflowed its banks and flooded the "
    "lower part of the village, forcing dozens of families to move to the school gym.",
    # Everyday life.
    "I forgot my umbrella again.",
    "Could you pass me the salt, please?",
    "The children built a sandcastle that was washed away by the evening tide.",
    "He walks his dog every morning before work, rain or shine.",
    "Our neighbours are repainting their fence a bright shade of yellow.",
    "The coffee machine in the office has been broken since Monday.",
    # Science and nature.
    "Water boils at one hundred degrees Celsius at sea level.",
    "Black holes bend light so strongly that nothing can escape from inside the event horizon.",
    "Honeybees communicate the location of flowers through a waggle dance.",
    "The Amazon rainforest produces a significant share of the planet's oxygen and hosts "
    "millions of species, many of which have never been described by scientists.",
    "Earthquakes are caused by the sudden release of energy along geological faults.",
    "Mitochondria are often called the powerhouse of the cell.",
    "Octopuses have three hearts and blue blood.",
    # Technology and computing.
    "The server crashed during the nightly backup.",
    "Quantizing neural network weights to eight bits can shrink a model fourfold with little "
    "loss in accuracy.",
    "Please restart your computer to finish installing the updates.",
    "A hash table offers constant average time lookups.",
    "The startup released an open-source library for distributed training of large language "
    "models across thousands of GPUs.",
    "My phone battery dies before lunch.",
    "Garbage collection pauses can hurt the tail latency of web services.",
    # Sports.
    "The goalkeeper saved a penalty in the final minute.",
    "She ran her first marathon in under four hours.",
    "The tennis match was suspended because of bad light and will resume tomorrow afternoon.",
    "Cricket matches can last five days.",
    "The cycling team trained at high altitude for six weeks before the mountain stages of "
    "the tour.",
    # Food and cooking.
    "Fresh basil makes the tomato sauce taste much better.",
    "Slice the onions thinly and fry them slowly until golden.",
    "This restaurant serves the best ramen in town.",
    "Sourdough bread relies on wild yeast and lactic acid bacteria for its tangy flavour.",
    "I prefer tea.",
    # History and culture.
    "The Roman Empire built roads that connected distant provinces.",
    "The printing press transformed how knowledge spread across Europe.",
    "Many museums now offer free admission on the first Sunday of every month.",
    "The ancient library of Alexandria was one of the largest and most significant libraries "
    "of the ancient world, though the details of its destruction remain disputed.",
    "Jazz originated in New Orleans.",
    "The orchestra played Beethoven's ninth symphony to a sold-out hall.",
    # Economics and politics.
    "Inflation eroded the purchasing power of savings.",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Parliament debated the new climate bill late into the night.",
    "Rising housing costs push young families out of city centres and into distant suburbs "
    "with long commutes.",
    "Stocks fell sharply.",
    # Health and medicine.
    "Regular exercise lowers the risk of heart disease.",
    "The doctor prescribed antibiotics for the infection.",
    "Getting enough sleep improves memory and concentration.",
    "Vaccines train the immune system to recognise pathogens without causing the disease itself.",
    # Travel and geography.
    "Mount Everest is the highest mountain above sea level.",
    "We missed our connecting flight in Frankfurt.",
    "The ferry crosses the fjord twice a day during the summer season.",
    "Tokyo is a huge city.",
    "The desert nights were surprisingly cold, so we wrapped ourselves in blankets and watched "
    "the stars until dawn.",
    # Questions, commands and short fragments.
    "What time does the museum open?",
    "Turn left at the bakery.",
    "Is this seat taken?",
    "Nobody expected that.",
    "Why is the sky blue?",
    # Longer narrative and abstract sentences.
    "The old lighthouse keeper kept a detailed journal of every ship that passed, the weather "
    "each evening, and the seabirds that nested on the rocks below his window.",
    "Good software design is less about clever tricks and more about making the next change easy.",
    "Although the experiment failed, the team learned enough to design a much better one.",
    "Friendship often grows from small kindnesses repeated over many years.",
    "The detective noticed that the clock on the mantelpiece had stopped at exactly "
    "a quarter past midnight.",
    "Learning a second language changes the way you think about your first one.",
    "The committee postponed its decision until more data becomes available.",
    "A gentle breeze carried the scent of pine trees across the quiet lake.",
    "When the power went out during the storm, the whole street gathered in the "
    "old bakery, where the owner lit candles, handed out warm bread, and told stories about "
    "the great blizzard of his childhood until the lights came back.",
)
