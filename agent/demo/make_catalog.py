"""Writes the demo catalog (``catalog.jsonl`` beside this file): 300 items of a small shop.

    python -m agent.demo.make_catalog

Deterministic: the same vocabulary gives the same file, byte for byte. Each of twelve
departments has five kinds of product and five variants, written for the purpose; an item is
one variant of one kind, with a title, a description that says what both are, the department
and the kind as categories, and a price. Departments are far apart in meaning (coffee and
cycling share nothing), so a visitor's clicks visibly pull the recommendations toward what
they liked.
"""

from __future__ import annotations

import json
from pathlib import Path

OUTPUT = Path(__file__).with_name("catalog.jsonl")

# department -> (kinds: (name, note), variants: (name, note))
DEPARTMENTS: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {
    "coffee": (
        [
            ("whole bean coffee", "roasted a week before it ships, to grind fresh each morning"),
            ("ground coffee", "ground medium-fine for filter and pour-over brewing"),
            ("cold brew concentrate", "steeped for eighteen hours; mix one part with three of milk or water"),
            ("espresso capsules", "compostable capsules for home espresso machines"),
            ("coffee tasting flight", "four small bags to taste side by side"),
        ],
        [
            ("Ethiopian Yirgacheffe", "floral, with notes of jasmine, lemon and bergamot"),
            ("Colombian Huila", "balanced and sweet, with caramel and red apple"),
            ("Sumatra Mandheling", "earthy and heavy-bodied, with cedar and dark chocolate"),
            ("Kenya AA", "bright and juicy, with blackcurrant and grapefruit"),
            ("Guatemala Antigua", "smooth, with cocoa, toffee and a hint of spice"),
        ],
    ),
    "tea": (
        [
            ("loose leaf tea", "whole leaves that unfurl in the pot and brew twice"),
            ("tea bags", "pyramid bags with room for the leaves to open"),
            ("tea tin", "an airtight tin that keeps a season's tea fresh"),
            ("iced tea pitcher blend", "a coarse blend made for cold brewing overnight"),
            ("tea sampler", "five small pouches to find a favourite"),
        ],
        [
            ("Darjeeling first flush", "light and muscatel, picked in early spring"),
            ("Japanese sencha", "grassy and sweet, steamed green tea"),
            ("Assam breakfast", "malty and strong, good with milk"),
            ("jasmine pearl", "green tea rolled by hand and scented with jasmine blossoms"),
            ("Yunnan oolong", "roasted and honeyed, with a long finish"),
        ],
    ),
    "baking": (
        [
            ("sourdough starter kit", "a live culture with a feeding guide for the first week"),
            ("bread flour", "high-protein flour for an open, chewy crumb"),
            ("proofing basket", "a rattan banneton that shapes the loaf and marks its crust"),
            ("baking stone", "a cordierite stone that stores heat for a crisp base"),
            ("pastry set", "a rolling pin, cutters and a bench scraper"),
        ],
        [
            ("rustic country", "for dark-crusted loaves with a tangy crumb"),
            ("whole wheat", "stone-milled for a nutty, wholesome bake"),
            ("rye", "for dense, aromatic Nordic breads"),
            ("spelt", "an ancient grain with a sweet, mild taste"),
            ("Italian tipo 00", "finely milled for pizza and fresh pasta"),
        ],
    ),
    "cookware": (
        [
            ("cast iron skillet", "pre-seasoned, and it lasts for generations"),
            ("chef's knife", "a forged blade that holds its edge"),
            ("Dutch oven", "enamelled for stews, braises and no-knead bread"),
            ("wok", "carbon steel that heats fast for stir-fries"),
            ("saucepan", "tri-ply steel with an even, gentle heat"),
        ],
        [
            ("ten-inch", "sized for a family meal"),
            ("professional", "made for daily use in busy kitchens"),
            ("compact", "for small kitchens and cooking for two"),
            ("heirloom", "a heavy piece to hand down"),
            ("induction-ready", "works on every hob, induction included"),
        ],
    ),
    "camping": (
        [
            ("tent", "pitches in five minutes and stands up to wind and rain"),
            ("sleeping bag", "a mummy cut that keeps warmth in on cold nights"),
            ("camp stove", "boils a litre of water in three minutes"),
            ("headlamp", "rechargeable, with a red light for the night sky"),
            ("trekking backpack", "an adjustable frame that carries a week's gear"),
        ],
        [
            ("ultralight", "for thru-hikers who count every gram"),
            ("four-season", "built for snow, wind and mountain weather"),
            ("family", "roomy enough for everyone and the dog"),
            ("backcountry", "tough enough for trips far from any road"),
            ("festival", "easy to carry, quick to set up, cheerful to look at"),
        ],
    ),
    "cycling": (
        [
            ("road bike", "a light frame and drop bars for long fast rides"),
            ("bike helmet", "ventilated and certified, with a rear light"),
            ("cycling jersey", "wicking fabric with three back pockets"),
            ("bike lights set", "front and rear lights that charge over USB"),
            ("pannier bags", "waterproof bags that clip onto a rack"),
        ],
        [
            ("carbon race", "stiff and light, for racing and climbing"),
            ("commuter", "reliable for every day in city traffic"),
            ("gravel", "for mixed roads, forest tracks and adventure"),
            ("touring", "for loaded trips over many days"),
            ("winter", "for dark mornings, cold and wet roads"),
        ],
    ),
    "running": (
        [
            ("running shoes", "cushioned and responsive over long distances"),
            ("running jacket", "a windproof shell that packs into its own pocket"),
            ("hydration vest", "soft flasks within reach while you run"),
            ("GPS running watch", "pace, distance and heart rate on the wrist"),
            ("running socks", "blister-free seams and arch support"),
        ],
        [
            ("trail", "with grip for mud, rock and steep descents"),
            ("marathon", "for race day and the long runs before it"),
            ("track", "for speed sessions and intervals"),
            ("road", "for daily miles on pavement"),
            ("recovery", "for easy days and tired legs"),
        ],
    ),
    "gardening": (
        [
            ("seed collection", "open-pollinated seeds with a sowing calendar"),
            ("raised bed", "a cedar frame that needs no digging"),
            ("pruning shears", "bypass blades for clean cuts on live stems"),
            ("compost bin", "turns kitchen scraps into rich soil in a season"),
            ("watering can", "a long spout and a fine rose for seedlings"),
        ],
        [
            ("heirloom tomato", "for a summer of sweet, colourful tomatoes"),
            ("herb garden", "basil, thyme, parsley and chives by the kitchen door"),
            ("pollinator", "flowers that bring bees and butterflies"),
            ("vegetable patch", "for beans, peas, lettuce and courgettes"),
            ("balcony", "sized for small spaces and containers"),
        ],
    ),
    "board games": (
        [
            ("strategy board game", "careful plans, and a different game every time"),
            ("cooperative board game", "everyone wins or loses together"),
            ("card game", "quick to learn and easy to carry"),
            ("puzzle box", "hidden compartments and a mechanism to solve"),
            ("party game", "laughter for big groups in twenty minutes"),
        ],
        [
            ("space exploration", "chart planets and build a fleet among the stars"),
            ("medieval kingdom", "castles, trade routes and rival lords"),
            ("deep sea", "dive for treasure in the dark ocean"),
            ("haunted mansion", "a spooky mystery in a creaking old house"),
            ("railway tycoon", "lay track and deliver goods across the continent"),
        ],
    ),
    "science fiction": (
        [
            ("novel", "a paperback to read in one long weekend"),
            ("short story collection", "a dozen stories from award-winning authors"),
            ("graphic novel", "painted panels and a sweeping story"),
            ("audiobook", "unabridged, read by a full cast"),
            ("hardcover trilogy", "the complete saga in a slipcase"),
        ],
        [
            ("space opera", "galactic empires, starships and distant wars"),
            ("cyberpunk", "neon cities, hackers and corporations"),
            ("first contact", "humanity meets an alien mind"),
            ("time travel", "paradoxes, loops and changed histories"),
            ("post-apocalyptic", "survivors rebuild after the fall"),
        ],
    ),
    "jazz records": (
        [
            ("vinyl LP", "pressed on 180 gram vinyl with the original artwork"),
            ("live album", "recorded in one night at a small club"),
            ("box set", "the complete sessions with a booklet of photographs"),
            ("CD", "remastered from the original tapes"),
            ("songbook", "transcriptions of the solos for players"),
        ],
        [
            ("bebop", "fast tempos and virtuoso horn solos"),
            ("cool jazz", "relaxed, airy arrangements from the West Coast"),
            ("hard bop", "bluesy, soulful and driving"),
            ("modal jazz", "long, spacious improvisations over few chords"),
            ("jazz fusion", "electric keyboards, funk rhythms and rock energy"),
        ],
    ),
    "houseplants": (
        [
            ("potted plant", "delivered in a nursery pot with care instructions"),
            ("ceramic planter", "glazed by hand, with a drainage hole and saucer"),
            ("plant food", "a gentle liquid feed for the growing season"),
            ("terrarium kit", "a glass jar, soil layers and a small plant"),
            ("propagation station", "glass tubes to root cuttings in water"),
        ],
        [
            ("monstera", "large split leaves for a bright room"),
            ("snake plant", "upright leaves that thrive on neglect"),
            ("fern", "soft fronds for a humid bathroom"),
            ("succulent", "for a sunny windowsill and rare watering"),
            ("pothos", "trailing vines that grow in low light"),
        ],
    ),
}


def slug(text: str) -> str:
    return "-".join(text.lower().split())


def items() -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for department, (kinds, variants) in DEPARTMENTS.items():
        number = 0
        for kind, kind_note in kinds:
            for variant, variant_note in variants:
                number += 1
                title = f"{variant[0].upper()}{variant[1:]} {kind}"
                # a price from the item's place in the catalog: varied, and the same on every run
                cents = 499 + (len(out) * 1_237) % 9_000
                out.append(
                    {
                        "id": f"{slug(department)}-{number:02d}",
                        "title": title,
                        "text": f"{kind[0].upper()}{kind[1:]}, {kind_note}; {variant}: {variant_note}.",
                        "categories": [department, kind],
                        "attributes": {"price": round(cents / 100, 2)},
                    }
                )
    return out


def main() -> None:
    lines = (json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n" for item in items())
    OUTPUT.write_text("".join(lines), encoding="utf-8")
    print(f"{len(items())} items written to {OUTPUT}")


if __name__ == "__main__":
    main()
