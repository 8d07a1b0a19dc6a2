"""The local stand-ins of `make run` and the tests: the Razorpay/Stripe simulator, the SMS/push
sandbox, the demo workload. Production code never imports this package (an import-linter
contract)."""
