//! vidpipe's RabbitMQ adapter.
//!
//! Producers of the old system publish JSON commands to one RabbitMQ queue
//! per service. This crate will consume those queues and turn each command
//! into a record on `vidpipe.commands`, and mirror lifecycle events back to a
//! RabbitMQ topic exchange (issue 5). It is a separate crate so that the core
//! pipeline does not depend on lapin and AMQP can be left out of a build.
