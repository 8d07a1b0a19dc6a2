"""Payment gateway adapters (Razorpay, Stripe) and the local gateway simulator."""
