"""`depn demo`: the whole story on the built-in test-bed, and the launcher that runs `depn serve` as a child."""
