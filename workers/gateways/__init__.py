"""Payment gateways: the Razorpay and Stripe adapters (every answer sorted into transient,
permanent or unknown), the circuit breaker per gateway, and the bounded fan-out that asks
about many things at once."""
