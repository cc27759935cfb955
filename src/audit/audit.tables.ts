/** Audit tables (owned by the audit module). */
export interface AuditTables {}
