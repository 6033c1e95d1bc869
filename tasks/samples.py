"""Generated sample data for the sample jobs and the demo (deterministic, no downloads)."""

from __future__ import annotations

import random

import pyarrow as pa

_PRODUCTS = ["router", "laptop", "headset", "monitor", "keyboard", "printer", "phone", "camera"]
_PROBLEMS = [
    ("billing", "I was charged twice for my {p} subscription this month and need a refund."),
    (
        "shipping",
        "My {p} order has not arrived yet and the tracking page has not changed in a week.",
    ),
    ("technical", "The {p} keeps disconnecting every few minutes since the last firmware update."),
    ("account", "I cannot log in to manage my {p} warranty; the password reset email never comes."),
    ("technical", "After plugging in the {p} the screen flickers and then goes completely black."),
    ("billing", "The invoice for my {p} shows the wrong company name and VAT number."),
]
_ADJECTIVES = ["compact", "wireless", "ergonomic", "rugged", "premium", "budget", "silent", "smart"]
_FEATURES = [
    "a long-lasting battery", "USB-C charging", "a two-year warranty", "noise cancellation",
    "a brushed aluminium body", "low power consumption", "a backlit display", "fast pairing",
]  # fmt: skip


def support_tickets(rows: int, seed: int = 7) -> pa.Table:
    rng = random.Random(seed)
    ids, subjects, bodies, tiers, products = [], [], [], [], []
    for i in range(rows):
        product = rng.choice(_PRODUCTS)
        _, text = rng.choice(_PROBLEMS)
        ids.append(f"T-{i + 1:06d}")
        subjects.append(f"{product.title()} issue #{rng.randint(100, 999)}")
        bodies.append(
            text.format(p=product)
            + " "
            + rng.choice(["Please help.", "Thanks!", "This is urgent."])
        )
        tiers.append(rng.choice(["free", "pro", "enterprise"]))
        products.append(product)
    return pa.table(
        {
            "ticket_id": ids,
            "subject": subjects,
            "body": bodies,
            "customer_tier": tiers,
            "product": products,
        }
    )


def product_descriptions(rows: int, seed: int = 11) -> pa.Table:
    rng = random.Random(seed)
    skus, titles, descriptions, prices = [], [], [], []
    for i in range(rows):
        product = rng.choice(_PRODUCTS)
        adjective = rng.choice(_ADJECTIVES)
        features = rng.sample(_FEATURES, 3)
        skus.append(f"SKU-{i + 1:07d}")
        titles.append(f"{adjective.title()} {product}")
        descriptions.append(
            f"A {adjective} {product} with {features[0]}, {features[1]} and {features[2]}. "
            f"Designed for everyday use at home and in the office."
        )
        prices.append(round(rng.uniform(9, 999), 2))
    return pa.table({"sku": skus, "title": titles, "description": descriptions, "price": prices})
