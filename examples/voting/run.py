"""Count an election through two pymq queues and a dead-letter queue.

    python examples/voting/run.py [--url pymq://127.0.0.1:PORT] [--data DIR]

submit puts each vote on queue votes. validate rejects bad votes (unknown
candidate, second vote of a voter) to votes.dlq with the reason, and moves
good ones to queue counted. count tallies counted, and notify prints the
result and the reasons in votes.dlq. Without --url the broker is embedded:
in DIR, or by default in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from collections import Counter
from typing import Any

import pymq

CANDIDATES = ("ada", "grace", "linus")
# (voter, candidate): two second votes and two unknown candidates.
VOTES = [
    ("alice", "ada"),
    ("bob", "grace"),
    ("carol", "ada"),
    ("dave", "linus"),
    ("erin", "grace"),
    ("bob", "ada"),
    ("frank", "ada"),
    ("grace", "turing"),
    ("heidi", "linus"),
    ("ivan", "ada"),
    ("judy", "grace"),
    ("carol", "linus"),
    ("mallory", "mallory"),
]
# Seconds a get waits for the next message before its queue counts as drained.
DRAIN_TIMEOUT = 0.5


def submit(broker: Any, election: str, votes: list[tuple[str, str]]) -> None:
    """Put each vote on queue votes as JSON, tagged with its election."""
    queue = broker.queue("votes")
    for voter, candidate in votes:
        body = json.dumps({"voter": voter, "candidate": candidate}).encode()
        queue.put(body, headers={"election": election})


def validate(broker: Any, election: str) -> None:
    """Move good votes to queue counted, and reject bad ones to votes.dlq."""
    votes, counted = broker.queue("votes"), broker.queue("counted")
    # NOTE: the voters seen are kept in memory, so a validator that restarts
    # mid-election would accept a second vote. A real one would store them.
    voters: set[str] = set()
    while (message := votes.get(timeout=DRAIN_TIMEOUT)) is not None:
        if message.headers.get("election") != election:
            message.ack()  # a vote of an earlier run on the same server
            continue
        vote = json.loads(message.body)
        if vote["candidate"] not in CANDIDATES:
            message.reject(f"unknown candidate {vote['candidate']!r}")
        elif vote["voter"] in voters:
            message.reject(f"voter {vote['voter']!r} has already voted")
        else:
            voters.add(vote["voter"])
            # Put before ack, so a crash between the two puts the vote on
            # counted twice rather than losing it.
            counted.put(message.body, headers={"election": election})
            message.ack()


def count(broker: Any, election: str) -> Counter[str]:
    """Tally the votes in queue counted, per candidate."""
    counted = broker.queue("counted")
    tally: Counter[str] = Counter({candidate: 0 for candidate in CANDIDATES})
    while (message := counted.get(timeout=DRAIN_TIMEOUT)) is not None:
        if message.headers.get("election") == election:
            tally[json.loads(message.body)["candidate"]] += 1
        message.ack()
    return tally


def rejected_votes(broker: Any, election: str) -> list[tuple[str, str]]:
    """Return (vote, reason) for each message of election in votes.dlq.

    Like `pymq dlq list`, it nacks every message back, so the DLQ keeps them.
    """
    dlq = broker.queue("votes.dlq")
    messages = []
    while (message := dlq.get(timeout=0)) is not None:
        messages.append(message)
    found = [
        (message.body.decode(), message.headers["x-reason"])
        for message in messages
        if message.headers.get("election") == election
    ]
    for message in messages:
        message.nack()
    return found


def notify(tally: Counter[str], rejected: list[tuple[str, str]]) -> None:
    """Print the tally, the winner and the rejected votes with their reasons."""
    for candidate, votes in tally.most_common():
        print(f"{candidate:<8}{votes:>3}")
    print(f"winner: {tally.most_common(1)[0][0]}")
    print(f"rejected to votes.dlq: {len(rejected)}")
    for body, reason in rejected:
        print(f"  {body}: {reason}")


def main(argv: list[str] | None = None) -> int:
    """Run the four stages in order, on one broker."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", help="server URL, pymq://127.0.0.1:PORT (default: embedded broker)"
    )
    parser.add_argument(
        "--data", help="folder of the embedded broker (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    # The broker logs each dead-letter move as a warning, on stderr.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    broker = pymq.connect(args.url) if args.url else pymq.open(args.data)
    election = uuid.uuid4().hex
    try:
        submit(broker, election, VOTES)
        validate(broker, election)
        notify(count(broker, election), rejected_votes(broker, election))
    finally:
        broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
